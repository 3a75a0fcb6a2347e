% # Switching mode keeps the kind of event shown: a pause and a cursor are the shown mode's alone.
% rebase('dashboard.tpl', title='Audit log', here='audit', back='/dashboard/audit' + ('?' + urlencode({'event_type': filters['event_type']}) if filters['event_type'] else ''))
<h1>Audit log</h1>
<form method="get" action="/dashboard/audit" class="filters">
  <label for="event_type">Event</label>
  <select id="event_type" name="event_type">
    <option value="">any</option>
% for event_type in event_types:
    <option{{!' selected' if event_type == filters['event_type'] else ''}}>{{event_type}}</option>
% end
  </select>
  <label for="pause_id">Pause</label>
  <input id="pause_id" name="pause_id" value="{{filters['pause_id']}}" placeholder="psr_…">
  <button type="submit" class="secondary">Filter</button>
</form>
<p><a href="/dashboard/audit.csv?{{!urlencode({k: v for k, v in filters.items() if v})}}" download>Download as CSV</a> (every matching event)</p>
% if not events:
<p id="empty">No events.</p>
% else:
<div class="scroll">
<table id="events">
  <thead><tr><th scope="col">Time (UTC)</th><th scope="col">Event</th><th scope="col">Actor</th><th scope="col">Pause</th><th scope="col">Data</th></tr></thead>
  <tbody>
% for event in events:
    <tr>
      <td>{{event['timestamp'].replace('T', ' ').rstrip('Z')}}</td>
      <td>{{event['event_type']}}</td>
      <td>{{event['actor']}}</td>
      <td>
% if event['pause_id']:
        <a href="/dashboard/pauses/{{event['pause_id']}}"><code>psr_…{{event['pause_id'][-8:]}}</code></a>
% end
      </td>
      <td class="text"><code>{{json_text(event['data'])}}</code></td>
    </tr>
% end
  </tbody>
</table>
</div>
% end
% if next_cursor:
<p><a href="/dashboard/audit?{{!urlencode(dict(cursor=next_cursor, **{k: v for k, v in filters.items() if v}))}}" rel="next">Older events</a></p>
% end
