% # Switching mode keeps the filter: a page's cursor is the shown mode's alone.
% rebase('dashboard.tpl', title='Pauses', here='pauses', back='/dashboard/pauses' + ('?status=' + status_filter if status_filter else ''))
<h1>Pauses</h1>
<form method="get" action="/dashboard/pauses" class="filters">
  <label for="status">Status</label>
  <select id="status" name="status">
    <option value="">any</option>
% for name in ('pending', 'responded', 'timed_out', 'cancelled'):
    <option value="{{name}}"{{!' selected' if status_filter == name else ''}}>{{name.replace('_', ' ')}}</option>
% end
  </select>
  <button type="submit" class="secondary">Filter</button>
</form>
% if not page['pauses']:
<p id="empty">No pauses{{' with this status' if status_filter else ''}} yet. Create one with your {{'live' if caller.livemode else 'test'}} key: <code>POST /v1/pause</code>.</p>
% else:
<div class="scroll">
<table id="pauses">
  <thead><tr><th scope="col">Created (UTC)</th><th scope="col">Message</th><th scope="col" class="wide-only">Recipient</th><th scope="col">Status</th><th scope="col" class="wide-only">Choice</th></tr></thead>
  <tbody>
% for pause in page['pauses']:
    <tr>
      <td><a href="/dashboard/pauses/{{pause['pause_id']}}">{{pause['created_at'].replace('T', ' ').rstrip('Z')}}</a></td>
      <td class="text" dir="auto">{{pause['message'] if len(pause['message']) <= 90 else pause['message'][:89] + '…'}}</td>
      <td class="wide-only">{{pause['recipient']}} <span class="muted">({{pause['channel']}})</span></td>
      <td><span class="status {{pause['status']}}">{{pause['status'].replace('_', ' ')}}</span>{{!'<br><span class="narrow-only">' if pause['choice'] else ''}}{{pause['choice'] or ''}}{{!'</span>' if pause['choice'] else ''}}</td>
      <td class="wide-only">{{pause['choice'] or ''}}</td>
    </tr>
% end
  </tbody>
</table>
</div>
% end
% if page['next_cursor']:
<p><a href="/dashboard/pauses?{{!urlencode(dict(cursor=page['next_cursor'], **({'status': status_filter} if status_filter else {})))}}" rel="next">Older pauses</a></p>
% end
