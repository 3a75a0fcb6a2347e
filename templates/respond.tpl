% rebase('base.tpl', title='Your decision')
<p class="label">An agent is asking:</p>
<blockquote class="message">{{pause['message']}}</blockquote>
% if pause['status'] == 'pending':
  % if error:
<p class="error" role="alert">{{error}}</p>
  % elif picked:
<p class="picked">You picked <strong>{{picked}}</strong>. Tap it below to confirm.</p>
  % end
<form method="post" action="/respond/{{token}}">
  <div class="options">
  % for option in pause['options']:
    <button type="submit" name="choice" value="{{option}}"{{!' class="picked"' if option == picked else ''}}>{{option}}</button>
  % end
  </div>
  <label for="comment">Comment (optional)</label>
  <textarea id="comment" name="comment" rows="3" maxlength="2000"></textarea>
</form>
<p class="expiry">Open until {{times['expires_at']}}.
  % if pause['timeout_default']:
If nobody answers, <strong>{{pause['timeout_default']}}</strong> applies.
  % end
</p>
% elif pause['status'] == 'responded':
<p class="outcome" id="outcome">Recorded: <strong>{{pause['choice']}}</strong> at {{times['decided_at']}}.</p>
  % if pause['comment']:
<p class="comment">Comment: {{pause['comment']}}</p>
  % end
% elif pause['status'] == 'timed_out':
<p class="outcome" id="outcome">This request expired at {{times['decided_at']}}.
  % if pause['choice']:
The default <strong>{{pause['choice']}}</strong> was applied.
  % end
</p>
% else:
<p class="outcome" id="outcome">The agent cancelled this request at {{times['decided_at']}}.</p>
% end
